-- Tenants' todo lists: the schema the demo, the docs and the tests use.
-- Plain SQL as cr-sqlite users write it; `crsql_as_crr` marks synced tables.

CREATE TABLE lists (
  id INTEGER PRIMARY KEY NOT NULL,
  tenant_id TEXT NOT NULL,
  owner TEXT NOT NULL,
  name TEXT
);

CREATE TABLE todos (
  id INTEGER PRIMARY KEY NOT NULL,
  tenant_id TEXT NOT NULL,
  list_id INTEGER,
  owner TEXT,
  title TEXT,
  done INTEGER NOT NULL DEFAULT 0,
  priority INTEGER
);
CREATE INDEX todos_list ON todos (list_id);

-- Who may see a list besides its owner.
CREATE TABLE members (
  list_id INTEGER NOT NULL,
  user_id TEXT NOT NULL,
  tenant_id TEXT NOT NULL,
  PRIMARY KEY (list_id, user_id)
);

-- A local table: never synced, never subject to policies.
CREATE TABLE local_settings (key TEXT PRIMARY KEY, value TEXT);

SELECT crsql_as_crr('lists');
SELECT crsql_as_crr('todos');
SELECT crsql_as_crr('members');
