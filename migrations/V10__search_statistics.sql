-- Searches (`ILIKE '%term%'`) have two plans: walk the primary key in id order, filtering, or
-- collect the matches from the trigram indexes and sort them. Which is cheaper depends on how
-- many rows match, which the planner estimates from the columns' statistics. With the default
-- sample, a term in 1% of the rows was estimated at 0.02%, so its page sorted 10,000 matches
-- instead of walking 1,100 rows (40-60 ms instead of 3), and its capped count turned into a
-- sequential scan whenever the indexes' pending lists grew under writes (140 ms instead of 15).
-- A sample ten times larger estimates such terms within a few percent.
ALTER TABLE normalized_data
    ALTER COLUMN name SET STATISTICS 1000,
    ALTER COLUMN description SET STATISTICS 1000;
ANALYZE normalized_data (name, description);
