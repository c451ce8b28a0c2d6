CREATE OR REPLACE MACRO as_of(tbl, ts) AS TABLE WITH c0 AS (
    SELECT c.*, (SELECT k.keys FROM bemi_tt_keys k WHERE (k."table" = tbl
        OR k."schema" || '.' || k."table" = tbl) LIMIT 1) AS __keys
    FROM changes c WHERE (c."table" = tbl OR c."schema" || '.' || c."table" = tbl)
),
cut AS (
    SELECT min(commit_position) AS p FROM c0 WHERE committed_at > CAST(ts AS TIMESTAMPTZ)
),
scoped AS (
    SELECT c0.* FROM c0, cut WHERE cut.p IS NULL OR c0.commit_position < cut.p
),
latest AS (
    SELECT primary_key AS k, max((commit_position, ordinal)) AS at, arg_max_null(CASE WHEN operation = 'DELETE' THEN NULL ELSE CAST(after AS VARCHAR) END, (commit_position, ordinal)) AS payload
    FROM scoped WHERE primary_key IS NOT NULL GROUP BY primary_key
),
moves AS (
    SELECT ok AS k, pk AS to_k, cp, o FROM (
        SELECT CASE WHEN len(__keys) = 1 THEN json_extract_string(before, '/' || __keys[1]) WHEN len(__keys) > 1 THEN CAST(to_json(list_transform(__keys, lambda x: json_extract(before, '/' || x))) AS VARCHAR) END AS ok, primary_key AS pk, commit_position AS cp, ordinal AS o
        FROM scoped WHERE operation = 'UPDATE' AND CASE WHEN len(__keys) = 1 THEN json_extract_string(before, '/' || __keys[1]) WHEN len(__keys) > 1 THEN CAST(to_json(list_transform(__keys, lambda x: json_extract(before, '/' || x))) AS VARCHAR) END IS NOT NULL
    ) m WHERE ok IS NOT NULL AND ok IS DISTINCT FROM pk
),
moved AS (
    SELECT k, max((cp, o)) AS at FROM moves GROUP BY k
),
truncates AS (
    SELECT max((commit_position, ordinal)) AS t FROM scoped WHERE operation = 'TRUNCATE'
),
present AS (
    SELECT latest.k AS k, latest.at[1] AS cp, latest.at[2] AS o, latest.payload AS payload
    FROM latest LEFT JOIN moved ON moved.k = latest.k CROSS JOIN truncates
    WHERE latest.payload IS NOT NULL AND (moved.at IS NULL OR latest.at > moved.at)
      AND (truncates.t IS NULL OR latest.at > truncates.t)
)
SELECT k AS primary_key, CAST(coalesce(json_merge_patch(payload, (SELECT json_group_object(f.name, json(f.fill)) FROM bemi_tt_fills f WHERE (f."table" = tbl OR f."schema" || '.' || f."table" = tbl) AND f.committed_at <= CAST(ts AS TIMESTAMPTZ) AND (present.cp, present.o) < (f.cp, f.o))), payload) AS JSON) AS "row", cp AS commit_position, o AS ordinal
FROM present ORDER BY k
