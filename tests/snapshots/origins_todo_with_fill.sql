WITH moves AS (
    SELECT ok AS k, pk AS to_k, cp, o FROM (
        SELECT before_primary_key AS ok, primary_key AS pk, commit_position AS cp, ordinal AS o
        FROM "o" WHERE operation = 'UPDATE' AND before_primary_key IS NOT NULL
    ) m WHERE ok IS NOT NULL AND ok IS DISTINCT FROM pk
),
events AS (
    SELECT primary_key AS k, commit_position AS cp, ordinal AS o, operation AS op, after AS payload
    FROM "o" WHERE operation <> 'TRUNCATE' AND primary_key IS NOT NULL
    UNION ALL
    SELECT k, cp, o, 'DELETE', NULL FROM moves
),
truncates AS (
    SELECT max((commit_position, ordinal)) AS t FROM "o" WHERE operation = 'TRUNCATE'
),
births AS (
    SELECT k, max((cp, o)) FILTER (WHERE op NOT IN ('CREATE', 'UPDATE', 'SNAPSHOT')) AS gone
    FROM events GROUP BY k
),
lineage AS (
    SELECT k, k AS src, gone AS lo, NULL AS hi FROM births
        WHERE k NOT IN (SELECT k FROM "o_lineage")
    UNION ALL SELECT l.k, l.src, CASE WHEN l.lo IS NOT NULL THEN (l.lo.cp, l.lo.o) END,
        CASE WHEN l.hi IS NOT NULL THEN (l.hi.cp, l.hi.o) END FROM "o_lineage" l
        WHERE l.k IN (SELECT k FROM births)
),
versions AS (
    SELECT l.k AS k, c.commit_position AS cp, c.ordinal AS o, c.operation AS op,
           epoch_us(c.committed_at) AS committed_at, CAST(c.context AS VARCHAR) AS context,
           CAST(c.after AS VARCHAR) AS after
    FROM "o" c JOIN lineage l ON l.src = c.primary_key CROSS JOIN truncates
    WHERE c.operation IN ('CREATE', 'UPDATE', 'SNAPSHOT')
      AND (l.lo IS NULL OR (c.commit_position, c.ordinal) > l.lo)
      AND (l.hi IS NULL OR (c.commit_position, c.ordinal) < l.hi)
      AND (truncates.t IS NULL OR (c.commit_position, c.ordinal) > truncates.t)
),
valued AS (
    SELECT k, cp, o, op, committed_at, context,
           CAST(json_extract(after, ['/id', '/task', '/done', '/price', '/due', '/points']) AS VARCHAR[]) AS raw FROM versions
),
filled AS (
    SELECT *, [raw[1], raw[2], raw[3], raw[4], raw[5], CASE WHEN (cp, o) < (20, 0) THEN CAST(CAST('3' AS JSON) AS VARCHAR) ELSE raw[6] END] AS v FROM valued
),
marked AS (
    SELECT *, lag(v) OVER w AS p, row_number() OVER w AS n FROM filled
    WINDOW w AS (PARTITION BY k ORDER BY cp, o)
),
flagged AS (
    SELECT k, cp, o, op, committed_at, context, (n = 1 OR v[1] IS DISTINCT FROM p[1]) AS ch1, (n = 1 OR v[2] IS DISTINCT FROM p[2]) AS ch2, (n = 1 OR v[3] IS DISTINCT FROM p[3]) AS ch3, (n = 1 OR v[4] IS DISTINCT FROM p[4]) AS ch4, (n = 1 OR v[5] IS DISTINCT FROM p[5]) AS ch5, ((cp, o) >= (20, 0) AND (n = 1 OR v[6] IS DISTINCT FROM p[6])) AS ch6 FROM marked
),
picked AS (
    SELECT k, arg_max({'cp': cp, 'o': o, 'op': op, 'committed_at': committed_at, 'context': context}, (cp, o)) FILTER (WHERE ch1) AS c1, arg_max({'cp': cp, 'o': o, 'op': op, 'committed_at': committed_at, 'context': context}, (cp, o)) FILTER (WHERE ch2) AS c2, arg_max({'cp': cp, 'o': o, 'op': op, 'committed_at': committed_at, 'context': context}, (cp, o)) FILTER (WHERE ch3) AS c3, arg_max({'cp': cp, 'o': o, 'op': op, 'committed_at': committed_at, 'context': context}, (cp, o)) FILTER (WHERE ch4) AS c4, arg_max({'cp': cp, 'o': o, 'op': op, 'committed_at': committed_at, 'context': context}, (cp, o)) FILTER (WHERE ch5) AS c5, arg_max({'cp': cp, 'o': o, 'op': op, 'committed_at': committed_at, 'context': context}, (cp, o)) FILTER (WHERE ch6) AS c6 FROM flagged GROUP BY k
),
cells AS (
    SELECT k, unnest(range(0, 6)) AS i, unnest([c1, c2, c3, c4, c5, c6]) AS v FROM picked
)
SELECT k, i, v.cp, v.o, v.op, v.committed_at, v.context FROM cells WHERE v IS NOT NULL
