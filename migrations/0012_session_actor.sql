-- Who logged in with each session: `dashboard` for the admin token, else a [[user]]'s name.
ALTER TABLE sessions ADD COLUMN actor TEXT NOT NULL DEFAULT 'dashboard';
