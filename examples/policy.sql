-- Row-level security for the todo-list example (see docs/POLICY.md).
-- Claims: sub = user id, role = 'authenticated', tenant_id = the user's tenant.

-- Lists: everyone in the tenant sees them; only the owner changes them.
CREATE POLICY lists_tenant_read ON lists FOR SELECT TO authenticated
  USING (tenant_id = auth.claim('tenant_id'));
CREATE POLICY lists_owner_write ON lists FOR ALL TO authenticated
  USING (owner = auth.uid() AND tenant_id = auth.claim('tenant_id'))
  WITH CHECK (owner = auth.uid() AND tenant_id = auth.claim('tenant_id'));

-- Members: a user sees the memberships of their tenant.
CREATE POLICY members_tenant_read ON members FOR SELECT TO authenticated
  USING (tenant_id = auth.claim('tenant_id'));
CREATE POLICY members_list_owner ON members FOR ALL TO authenticated
  USING (tenant_id = auth.claim('tenant_id')
         AND list_id IN (SELECT id FROM lists WHERE owner = auth.uid()))
  WITH CHECK (tenant_id = auth.claim('tenant_id')
              AND list_id IN (SELECT id FROM lists WHERE owner = auth.uid()));

-- Todos: per owner, plus every todo of a list the user is a member of.
CREATE POLICY todos_owner ON todos FOR SELECT TO authenticated
  USING (owner = auth.uid());
CREATE POLICY todos_shared ON todos FOR SELECT TO authenticated
  USING (list_id IN (SELECT list_id FROM members WHERE user_id = auth.uid()));
CREATE POLICY todos_insert ON todos FOR INSERT TO authenticated
  WITH CHECK (owner = auth.uid() AND tenant_id = auth.claim('tenant_id'));
CREATE POLICY todos_update ON todos FOR UPDATE TO authenticated
  USING (owner = auth.uid()
         OR list_id IN (SELECT list_id FROM members WHERE user_id = auth.uid()))
  WITH CHECK (tenant_id = auth.claim('tenant_id'));
CREATE POLICY todos_delete ON todos FOR DELETE TO authenticated
  USING (owner = auth.uid());

-- Whatever else grants access, never across tenants.
CREATE POLICY todos_same_tenant ON todos AS RESTRICTIVE FOR ALL TO public
  USING (tenant_id = auth.claim('tenant_id'));
