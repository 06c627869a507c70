-- Dashboard login sessions, so that logging out ends one for good. A session is kept by the
-- sha256 of its cookie's nonce, never by the cookie itself.

CREATE TABLE sessions (
    id TEXT PRIMARY KEY,
    expires_at INTEGER NOT NULL
);
