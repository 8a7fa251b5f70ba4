-- Optional hysteresis for rules (beyond the reference): after firing, a rule re-arms only once the value
-- has cleared. `clear_threshold` NULL and `rearm_on_clear` false = the reference's behaviour (cooldown only).
ALTER TABLE rules
    ADD COLUMN clear_threshold double precision,
    ADD COLUMN rearm_on_clear  boolean NOT NULL DEFAULT false;
