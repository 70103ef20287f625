0DROP TABLE todos;
CREATE POLICY p ON local_settings USING (true)
