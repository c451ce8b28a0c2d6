WITH moves AS (
    SELECT ok AS k, pk AS to_k, cp, o FROM (
        SELECT (before ->> 'id') AS ok, primary_key AS pk, commit_position AS cp, ordinal AS o
        FROM t WHERE operation = 'UPDATE' AND before <> '{}'::jsonb
    ) m WHERE ok IS NOT NULL AND ok IS DISTINCT FROM pk
),
removals AS (
    SELECT primary_key AS k, commit_position AS cp, ordinal AS o FROM t WHERE operation = 'DELETE' AND primary_key IS NOT NULL
    UNION ALL
    SELECT k, cp, o FROM moves
),
gone AS (
    SELECT k, max(ARRAY[cp, o::bigint]) AS at FROM removals GROUP BY k
)
SELECT k, (gone.at)[1] AS cp, (gone.at)[2] AS o FROM gone
