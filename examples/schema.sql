-- Tenants' todo lists: the schema the demo, the docs and the tests use.
-- Plain SQL as cr-sqlite users write it; `crsql_as_crr` marks synced tables.
-- As in cr-sqlite, a CRR's non-key columns are nullable or have a DEFAULT:
-- a merge may insert a row before all its columns arrive.

CREATE TABLE lists (
  id INTEGER PRIMARY KEY NOT NULL,
  tenant_id TEXT,
  owner TEXT,
  name TEXT
);

CREATE TABLE todos (
  id INTEGER PRIMARY KEY NOT NULL,
  tenant_id TEXT,
  list_id INTEGER,
  owner TEXT,
  title TEXT,
  done INTEGER NOT NULL DEFAULT 0,
  priority INTEGER
);
CREATE INDEX todos_list ON todos (list_id);
-- Every policy pins the tenant column: index it, or each subscription's
-- snapshot reads every tenant's rows (the server warns at start).
CREATE INDEX todos_tenant ON todos (tenant_id, owner);
CREATE INDEX lists_tenant ON lists (tenant_id);

-- Who may see a list besides its owner.
CREATE TABLE members (
  list_id INTEGER NOT NULL,
  user_id TEXT NOT NULL,
  tenant_id TEXT,
  PRIMARY KEY (list_id, user_id)
);
CREATE INDEX members_tenant ON members (tenant_id, user_id);

-- A local table: never synced, never subject to policies.
CREATE TABLE local_settings (key TEXT PRIMARY KEY, value TEXT);

SELECT crsql_as_crr('lists');
SELECT crsql_as_crr('todos');
SELECT crsql_as_crr('members');
