CREATE OR REPLACE MACRO as_of(tbl, ts) AS TABLE WITH relation AS (
    SELECT h.rel FROM bemi_tt_names h WHERE (h."table" = tbl OR h."schema" || '.' || h."table" = tbl)
    ORDER BY (h.held_from IS NULL OR h.held_from <= CAST(ts AS TIMESTAMPTZ))
        AND (h.held_to IS NULL OR CAST(ts AS TIMESTAMPTZ) < h.held_to) DESC,
      h.held_to IS NULL DESC, h.held_from DESC NULLS LAST LIMIT 1
),
c0 AS (
    SELECT c.* REPLACE (coalesce(json_merge_patch(c.before, (SELECT json_group_object(n.new, json_extract(c.before, n.pointer)) FROM bemi_tt_renames n WHERE n.rel = s.rel
        AND (n.from_cp IS NULL OR (c.commit_position, c.ordinal) >= (n.from_cp, n.from_o))
        AND (n.to_cp IS NULL OR (c.commit_position, c.ordinal) < (n.to_cp, n.to_o)))), c.before) AS before, coalesce(json_merge_patch(c.after, (SELECT json_group_object(n.new, json_extract(c.after, n.pointer)) FROM bemi_tt_renames n WHERE n.rel = s.rel
        AND (n.from_cp IS NULL OR (c.commit_position, c.ordinal) >= (n.from_cp, n.from_o))
        AND (n.to_cp IS NULL OR (c.commit_position, c.ordinal) < (n.to_cp, n.to_o)))), c.after) AS after),
        (SELECT k.keys FROM bemi_tt_keys k WHERE k.rel = s.rel) AS __keys
    FROM changes c JOIN bemi_tt_segments s ON s.rel = (SELECT rel FROM relation) AND c."schema" = s."schema" AND c."table" = s."table" AND (s.from_cp IS NULL OR (c.commit_position, c.ordinal) >= (s.from_cp, s.from_o)) AND (s.to_cp IS NULL OR (c.commit_position, c.ordinal) < (s.to_cp, s.to_o))
),
keyed AS (
    SELECT c0.* REPLACE (CASE WHEN k.cp IS NOT NULL AND (c0.commit_position, c0.ordinal) < (k.cp, k.o) AND c0.operation <> 'TRUNCATE'
        THEN CASE WHEN c0.operation = 'DELETE' THEN CASE WHEN len(__keys) = 1 THEN json_extract_string(c0.before, '/' || __keys[1]) WHEN len(__keys) > 1 THEN CAST(to_json(list_transform(__keys, lambda x: json_extract(c0.before, '/' || x))) AS VARCHAR) END ELSE CASE WHEN len(__keys) = 1 THEN json_extract_string(c0.after, '/' || __keys[1]) WHEN len(__keys) > 1 THEN CAST(to_json(list_transform(__keys, lambda x: json_extract(c0.after, '/' || x))) AS VARCHAR) END END
        ELSE c0.primary_key END AS primary_key,
      CASE WHEN k.cp IS NOT NULL AND (c0.commit_position, c0.ordinal) < (k.cp, k.o)
        THEN CASE WHEN c0.operation = 'UPDATE' AND CAST(c0.before AS VARCHAR) <> '{}' THEN CASE WHEN len(__keys) = 1 THEN json_extract_string(c0.before, '/' || __keys[1]) WHEN len(__keys) > 1 THEN CAST(to_json(list_transform(__keys, lambda x: json_extract(c0.before, '/' || x))) AS VARCHAR) END END
        ELSE c0.before_primary_key END AS before_primary_key)
    FROM c0 LEFT JOIN bemi_tt_key_changes k ON k.rel = (SELECT rel FROM relation)
),
cut AS (
    SELECT min(commit_position) AS p FROM keyed WHERE committed_at > CAST(ts AS TIMESTAMPTZ)
),
scoped AS (
    SELECT keyed.* FROM keyed, cut
    WHERE cut.p IS NULL OR keyed.commit_position < cut.p
),
latest AS (
    SELECT primary_key AS k, max((commit_position, ordinal)) AS at, arg_max_null(CASE WHEN operation = 'DELETE' THEN NULL ELSE CAST(after AS VARCHAR) END, (commit_position, ordinal)) AS payload
    FROM scoped WHERE primary_key IS NOT NULL GROUP BY primary_key
),
moves AS (
    SELECT ok AS k, pk AS to_k, cp, o FROM (
        SELECT before_primary_key AS ok, primary_key AS pk, commit_position AS cp, ordinal AS o
        FROM scoped WHERE operation = 'UPDATE' AND before_primary_key IS NOT NULL
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
SELECT k AS primary_key, CAST(coalesce(json_merge_patch(payload, (SELECT json_group_object(f.name, json(f.fill)) FROM bemi_tt_fills f WHERE f.rel = (SELECT rel FROM relation) AND f.committed_at <= CAST(ts AS TIMESTAMPTZ) AND (present.cp, present.o) < (f.cp, f.o))), payload) AS JSON) AS "row", cp AS commit_position, o AS ordinal
FROM present ORDER BY k
