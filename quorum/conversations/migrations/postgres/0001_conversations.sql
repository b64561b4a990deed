-- Conversations and their messages (issue #14). `api_key` is the owning key's name, NULL
-- when auth is off. `message_count` is the next message's `seq`: an append locks the
-- conversation's row (SELECT ... FOR UPDATE), reads and bumps it, so appends from any node
-- are serialized and messages keep the order in which appends committed. `body` is the
-- message's JSON text as Quorum wrote it (text, not jsonb: kept byte for byte, and jsonb
-- refuses the "\u0000" escape that JSON allows).
CREATE TABLE conversations (
    id            text    PRIMARY KEY,
    api_key       text,
    created       bigint  NOT NULL,
    message_count integer NOT NULL DEFAULT 0 CHECK (message_count >= 0)
);

CREATE TABLE conversation_messages (
    conversation_id text    NOT NULL REFERENCES conversations (id) ON DELETE CASCADE,
    seq             integer NOT NULL CHECK (seq >= 0),
    body            text    NOT NULL,
    PRIMARY KEY (conversation_id, seq)
);
