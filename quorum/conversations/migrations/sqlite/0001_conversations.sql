-- Conversations and their messages (issue #14). `api_key` is the owning key's name, NULL
-- when auth is off. `message_count` is the next message's `seq`: an append reads and bumps
-- it inside its transaction, so messages keep the order in which appends committed.
CREATE TABLE conversations (
    id            TEXT    PRIMARY KEY,
    api_key       TEXT,
    created       INTEGER NOT NULL,
    message_count INTEGER NOT NULL DEFAULT 0 CHECK (message_count >= 0)
);

CREATE TABLE conversation_messages (
    conversation_id TEXT    NOT NULL REFERENCES conversations (id) ON DELETE CASCADE,
    seq             INTEGER NOT NULL CHECK (seq >= 0),
    body            TEXT    NOT NULL,
    PRIMARY KEY (conversation_id, seq)
) WITHOUT ROWID;
