2CREATE POLICY "sel" ON "Order" FOR SELECT USING ("select" > 0 AND "from" = auth.uid() AND "my col" || "é" <> '');
CREATE POLICY docs_org ON docs FOR SELECT USING (org = auth.claim('org'));
CREATE POLICY docs_acl ON docs FOR SELECT USING (id IN (SELECT doc FROM acl WHERE usr = auth.uid() AND lvl >= 1));
CREATE POLICY acl_own ON acl FOR ALL USING (usr = auth.uid());
