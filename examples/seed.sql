-- Seed data for the todo-list example: two tenants, a few users each.
-- Run on a server database after examples/schema.sql (the demo does it
-- through the service endpoint; `tenantsync sql <db> "$(cat examples/seed.sql)"`
-- works too). Users are token subjects (`sub`), tenants the `tenant_id` claim.

-- acme: alice owns "Launch" and shares it with bob; bob owns "Groceries".
INSERT INTO lists (id, tenant_id, owner, name) VALUES
  (1, 'acme', 'alice', 'Launch'),
  (2, 'acme', 'bob', 'Groceries');
INSERT INTO members (list_id, user_id, tenant_id) VALUES
  (1, 'bob', 'acme');
INSERT INTO todos (id, tenant_id, list_id, owner, title, done, priority) VALUES
  (1, 'acme', 1, 'alice', 'Write the announcement', 0, 1),
  (2, 'acme', 1, 'alice', 'Book the venue', 1, 2),
  (3, 'acme', 1, 'bob', 'Order t-shirts', 0, 3),
  (4, 'acme', 2, 'bob', 'Milk', 0, NULL),
  (5, 'acme', 2, 'bob', 'Coffee', 0, NULL);

-- globex: carol owns "Roadmap" and shares it with dave.
INSERT INTO lists (id, tenant_id, owner, name) VALUES
  (3, 'globex', 'carol', 'Roadmap');
INSERT INTO members (list_id, user_id, tenant_id) VALUES
  (3, 'dave', 'globex');
INSERT INTO todos (id, tenant_id, list_id, owner, title, done, priority) VALUES
  (6, 'globex', 3, 'carol', 'Q1 goals', 0, 1),
  (7, 'globex', 3, 'dave', 'Hiring plan', 0, 2),
  (8, 'globex', 3, 'carol', 'Budget (confidential)', 0, 1);
