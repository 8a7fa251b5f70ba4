-- Logout revokes a JWT by its `jti` (every token we issue carries one), not by comparing token strings: a
-- token spelled differently (padding appended) must not pass as another token. Rows written before this
-- migration keep their token text and still revoke by it; tokens without a jti are revoked by their text.
ALTER TABLE blacklist_tokens ALTER COLUMN token DROP NOT NULL;
ALTER TABLE blacklist_tokens ADD COLUMN jti varchar(255);
CREATE UNIQUE INDEX uq_blacklist_tokens_jti ON blacklist_tokens (jti);
ALTER TABLE blacklist_tokens ADD CONSTRAINT ck_blacklist_tokens_key CHECK (jti IS NOT NULL OR token IS NOT NULL);
