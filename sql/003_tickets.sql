-- Stream tickets: short-lived, single-use stand-ins for a bearer token in an EventSource URL.
-- Only a SHA-256 of each ticket is stored, so a database dump or a replica holds nothing usable.
CREATE TABLE taskstream.stream_tickets (
    ticket_hash      bytea PRIMARY KEY CHECK (octet_length(ticket_hash) = 32),
    user_id          text NOT NULL CHECK (char_length(user_id) BETWEEN 1 AND 200),
    task_ids         text[] NOT NULL CHECK (cardinality(task_ids) BETWEEN 1 AND 100),
    -- The bearer token's own expiry and scopes: a stream opened with a ticket still ends when
    -- the token that bought the ticket would have.
    token_expires_at double precision NOT NULL,
    scopes           text[] NOT NULL DEFAULT '{}',
    expires_at       timestamptz NOT NULL,
    created_at       timestamptz NOT NULL DEFAULT clock_timestamp()
);

-- Expired tickets are swept when new ones are issued.
CREATE INDEX stream_tickets_expires_idx ON taskstream.stream_tickets (expires_at);
