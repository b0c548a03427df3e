-- Completed idempotency records are pruned after the server's
-- `idempotency_retention`: the pruning query finds them by state and age.
CREATE INDEX idempotency_completed_at ON idempotency (state, created_at_us);
