WITH latest AS (
    SELECT primary_key AS k, max(ARRAY[commit_position, ordinal::bigint]) AS at, (array_agg(CASE WHEN operation = 'DELETE' THEN NULL ELSE after END ORDER BY commit_position DESC, ordinal DESC))[1] AS payload
    FROM t WHERE primary_key IS NOT NULL GROUP BY primary_key
),
moves AS (
    SELECT ok AS k, pk AS to_k, cp, o FROM (
        SELECT (before ->> 'id') AS ok, primary_key AS pk, commit_position AS cp, ordinal AS o
        FROM t WHERE operation = 'UPDATE' AND before <> '{}'::jsonb
    ) m WHERE ok IS NOT NULL AND ok IS DISTINCT FROM pk
),
moved AS (
    SELECT k, max(ARRAY[cp, o::bigint]) AS at FROM moves GROUP BY k
),
truncates AS (
    SELECT max(ARRAY[commit_position, ordinal::bigint]) AS t FROM t WHERE operation = 'TRUNCATE'
)
SELECT latest.k AS k, (latest.at)[1] AS cp, (latest.at)[2] AS o, latest.payload AS payload
FROM latest LEFT JOIN moved ON moved.k = latest.k CROSS JOIN truncates
WHERE latest.payload IS NOT NULL AND (moved.at IS NULL OR latest.at > moved.at)
  AND (truncates.t IS NULL OR latest.at > truncates.t)
