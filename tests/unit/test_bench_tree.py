"""bench.tree.change_tree, the sync section's change between runs: the files it names, and
only those, have new bytes of the same size, and each round names other files."""

from bench.tree import change_tree, make_tree


def contents(top):
    return {str(path.relative_to(top)): path.read_bytes() for path in top.rglob("*") if path.is_file()}


def test_rewrites_only_the_files_it_names_keeping_their_size(tmp_path):
    make_tree(tmp_path, 100, 64)
    before = contents(tmp_path)
    changed = change_tree(tmp_path, 3, 0)
    after = contents(tmp_path)
    assert len(changed) == 3
    assert after.keys() == before.keys()
    assert {name for name in after if after[name] != before[name]} == set(changed)
    assert all(len(after[name]) == 64 for name in changed)


def test_each_round_changes_other_files(tmp_path):
    make_tree(tmp_path, 100, 64)
    first, second = change_tree(tmp_path, 5, 0), change_tree(tmp_path, 5, 1)
    assert len(first) == len(second) == 5
    assert not set(first) & set(second)
