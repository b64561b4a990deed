-- Creating a conversation counts the key's conversations first ([conversations]
-- max_conversations): an index on the owning key keeps that count from scanning the table.
CREATE INDEX conversations_by_key ON conversations (api_key);
