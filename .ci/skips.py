"""Fails when pytest skipped a test for a reason CI does not expect.

    python .ci/skips.py JUNIT_XML [ALLOWED_REASON ...]

On CI's machine (no GPU) the CUDA tests skip, about a thousand of them; any other skip (a missing
webdataset, onnx or onnxruntime skips whole files, a test that skips itself by mistake) would hide among
them. Exit status 1 lists each unexpected skip with its reason; 0 prints the count per allowed reason.
"""
import collections
import sys
import xml.etree.ElementTree as ElementTree


def main(argv: list[str]) -> int:
    if not argv:
        print(__doc__.strip().split('\n\n')[1].strip(), file=sys.stderr)
        return 2
    path, allowed = argv[0], set(argv[1:])
    counts, unexpected = collections.Counter(), []
    for case in ElementTree.parse(path).getroot().iter('testcase'):
        for skipped in case.findall('skipped'):
            # pytest writes 'file:line: reason' for a skip with a location, else the bare reason.
            reason = skipped.get('message', '')
            bare = reason.split(': ', 1)[1] if reason.count(':') >= 2 and ': ' in reason else reason
            if reason in allowed or bare in allowed:
                counts[bare if bare in allowed else reason] += 1
            else:
                unexpected.append(f"{case.get('classname')}::{case.get('name')}: {reason}")
    for line in unexpected:
        print(f'ci: unexpected skip: {line}', file=sys.stderr)
    if unexpected:
        print(f'ci: error: {len(unexpected)} tests skipped for a reason CI does not allow '
              f'(allowed: {sorted(allowed)})', file=sys.stderr)
        return 1
    print('ci: skips, all expected: ' + (', '.join(f'{n} {r!r}' for r, n in counts.items()) or 'none'))
    return 0


if __name__ == '__main__':
    sys.exit(main(sys.argv[1:]))
