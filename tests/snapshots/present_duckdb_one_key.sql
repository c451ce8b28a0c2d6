WITH latest AS (
    SELECT primary_key AS k, max((commit_position, ordinal)) AS at, arg_max_null(CASE WHEN operation = 'DELETE' THEN NULL ELSE after END, (commit_position, ordinal)) AS payload
    FROM "c" WHERE primary_key IS NOT NULL GROUP BY primary_key
),
moves AS (
    SELECT ok AS k, pk AS to_k, cp, o FROM (
        SELECT json_extract_string(before, '/id') AS ok, primary_key AS pk, commit_position AS cp, ordinal AS o
        FROM "c" WHERE operation = 'UPDATE' AND CAST(before AS VARCHAR) <> '{}' AND NOT starts_with(CAST(before AS VARCHAR), '{"id": ' || primary_key || ',') AND NOT starts_with(CAST(before AS VARCHAR), '{"id": ' || CAST(to_json(primary_key) AS VARCHAR) || ',')
    ) m WHERE ok IS NOT NULL AND ok IS DISTINCT FROM pk
),
moved AS (
    SELECT k, max((cp, o)) AS at FROM moves GROUP BY k
),
truncates AS (
    SELECT max((commit_position, ordinal)) AS t FROM "c" WHERE operation = 'TRUNCATE'
)
SELECT latest.k AS k, latest.at[1] AS cp, latest.at[2] AS o, latest.payload AS payload
FROM latest LEFT JOIN moved ON moved.k = latest.k CROSS JOIN truncates
WHERE latest.payload IS NOT NULL AND (moved.at IS NULL OR latest.at > moved.at)
  AND (truncates.t IS NULL OR latest.at > truncates.t)
