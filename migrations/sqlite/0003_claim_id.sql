-- Which claim took a lease (MySQL reads its own claim back by it; kept the same everywhere).
ALTER TABLE sweeper_sessions ADD COLUMN claim_id INTEGER;
