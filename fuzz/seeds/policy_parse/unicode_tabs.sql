0-- é日本
	CREATE POLICY p ON todos FOR SELECT USING (title = 'é' AND	nope = 1);
