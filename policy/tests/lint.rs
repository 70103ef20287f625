//! Which tables a token reads only its own tenant's rows of
//! (`PolicySet::tenant_scoped_reads`): the server wakes a tenant's
//! long-polls only for changes of its rows in those tables, so a table
//! must be called scoped only when no policy lets a token read another
//! tenant's rows.

mod common;

use common::example_schema;
use tenantsync_policy::PolicySet;

fn scoped(policy: &str) -> Vec<(String, bool)> {
    let schema = example_schema();
    let set = PolicySet::parse("p.sql", policy, &schema).unwrap_or_else(|d| panic!("{d}"));
    let flags = set.tenant_scoped_reads("tenant_id", "tenant_id");
    schema
        .tables
        .iter()
        .map(|t| t.name.clone())
        .zip(flags)
        .collect()
}

fn of(policy: &str, table: &str) -> bool {
    scoped(policy)
        .into_iter()
        .find(|(t, _)| t == table)
        .unwrap_or_else(|| panic!("no table {table}"))
        .1
}

#[test]
fn the_examples_read_only_their_tenant() {
    let all = scoped(include_str!("../../examples/policy.sql"));
    let want = [
        ("lists", true),
        ("todos", true),
        ("members", true),
        ("local_settings", false),
    ];
    let want: Vec<(String, bool)> = want.iter().map(|(t, s)| (t.to_string(), *s)).collect();
    assert_eq!(all, want);
}

#[test]
fn each_reading_policy_needs_the_pin() {
    let cases: &[(&str, &str, bool)] = &[
        // No policy reads it: nothing of it is read.
        ("", "lists", true),
        (
            "CREATE POLICY p ON lists FOR SELECT USING (tenant_id = auth.claim('tenant_id'));",
            "lists",
            true,
        ),
        (
            "CREATE POLICY p ON lists FOR SELECT USING (owner = auth.uid() AND auth.claim('tenant_id') = tenant_id);",
            "lists",
            true,
        ),
        // Another tenant's rows match `owner = auth.uid()`.
        ("CREATE POLICY p ON lists FOR SELECT USING (owner = auth.uid());", "lists", false),
        // OR: one branch without the pin.
        (
            "CREATE POLICY p ON lists FOR SELECT USING (tenant_id = auth.claim('tenant_id') OR owner = auth.uid());",
            "lists",
            false,
        ),
        // A second permissive policy without it.
        (
            "CREATE POLICY p ON lists FOR SELECT USING (tenant_id = auth.claim('tenant_id'));
             CREATE POLICY q ON lists FOR ALL USING (owner = auth.uid());",
            "lists",
            false,
        ),
        // A RESTRICTIVE policy pins for every role.
        (
            "CREATE POLICY q ON lists FOR SELECT USING (owner = auth.uid());
             CREATE POLICY r ON lists AS RESTRICTIVE FOR ALL USING (tenant_id = auth.claim('tenant_id'));",
            "lists",
            true,
        ),
        // A restrictive policy for INSERT does not restrict reads.
        (
            "CREATE POLICY q ON lists FOR SELECT USING (owner = auth.uid());
             CREATE POLICY r ON lists AS RESTRICTIVE FOR INSERT WITH CHECK (tenant_id = auth.claim('tenant_id'));",
            "lists",
            false,
        ),
        // Write-only policies do not read.
        (
            "CREATE POLICY w ON lists FOR INSERT WITH CHECK (owner = auth.uid());",
            "lists",
            true,
        ),
        // Silencing the warning does not make it scoped.
        (
            "-- tenantsync: cross-tenant
             CREATE POLICY p ON lists FOR SELECT USING (true);",
            "lists",
            false,
        ),
        // Another claim is not the tenant.
        (
            "CREATE POLICY p ON lists FOR SELECT USING (tenant_id = auth.claim('org'));",
            "lists",
            false,
        ),
        // A table without the column is never scoped.
        ("", "local_settings", false),
    ];
    for (policy, table, want) in cases {
        assert_eq!(of(policy, table), *want, "{table} under {policy}");
    }
}
