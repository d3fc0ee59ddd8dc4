// A line diff of two versions of a shard (longest common subsequence), for the
// history panel. Contents that parse as JSON objects or arrays are compared
// pretty-printed, so a one-field change is one line.

// The comparison table holds one cell per pair of differing lines.
export const MAX_CELLS = 4_000_000;

export function lines(content) {
  let text = content;
  try {
    const value = JSON.parse(content);
    if (value !== null && typeof value === "object") text = JSON.stringify(value, null, 2);
  } catch {
    // plain text
  }
  return text === "" ? [] : text.split("\n");
}

// [{op: " " | "-" | "+", text}] turning `before` into `after`, or null when the parts
// that differ are too long to compare here.
export function diff(before, after) {
  const a = lines(before);
  const b = lines(after);
  // Common prefix and suffix first: versions usually differ in a few lines.
  let start = 0;
  while (start < a.length && start < b.length && a[start] === b[start]) start++;
  let endA = a.length;
  let endB = b.length;
  while (endA > start && endB > start && a[endA - 1] === b[endB - 1]) {
    endA--;
    endB--;
  }
  const midA = a.slice(start, endA);
  const midB = b.slice(start, endB);
  const n = midA.length;
  const m = midB.length;
  if ((n + 1) * (m + 1) > MAX_CELLS) return null;
  // lcs[i][j]: length of the longest common subsequence of midA[i:] and midB[j:].
  const lcs = Array.from({ length: n + 1 }, () => new Uint32Array(m + 1));
  for (let i = n - 1; i >= 0; i--) {
    for (let j = m - 1; j >= 0; j--) {
      lcs[i][j] = midA[i] === midB[j] ? lcs[i + 1][j + 1] + 1 : Math.max(lcs[i + 1][j], lcs[i][j + 1]);
    }
  }
  const out = a.slice(0, start).map((text) => ({ op: " ", text }));
  let i = 0;
  let j = 0;
  while (i < n || j < m) {
    if (i < n && j < m && midA[i] === midB[j]) {
      out.push({ op: " ", text: midA[i] });
      i++;
      j++;
    } else if (i < n && (j === m || lcs[i + 1][j] >= lcs[i][j + 1])) {
      // Removals before additions, as unified diffs show them.
      out.push({ op: "-", text: midA[i] });
      i++;
    } else {
      out.push({ op: "+", text: midB[j] });
      j++;
    }
  }
  for (const text of a.slice(endA)) out.push({ op: " ", text });
  return out;
}
