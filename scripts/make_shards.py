#!/usr/bin/env python3
"""Write WebDataset shards from an ImageFolder, for ``train.py --dataset wds/NAME --data-dir OUTPUT``.

    python scripts/make_shards.py /data/imagenet /data/imagenet-wds --splits train val --shard-size 1000

Each sample holds the image file's bytes (not re-encoded), its ImageFolder class index and its file name;
``OUTPUT/_info.json`` lists the shards, their sizes and the classes. Images are shuffled (``--seed``) so
every shard mixes classes. Every image is decoded first: broken files are named and refused (or, with
``--skip-broken``, left out and listed in ``_info.json``); ``.bmp/.tif/.gif`` files and 16-bit greys are
stored as 8-bit PNG. The output folder is built under a temporary name and appears only when
complete; an existing one is replaced only with ``--force``. Errors are one line, exit status 2.
"""
import os
import sys

from ddfnet.cli import OneLineArgumentParser, UserError, run_main
from ddfnet.data.shards import BrokenImages, write_shards


def main(argv=None) -> None:
    parser = OneLineArgumentParser(prog='make_shards.py', description=__doc__.split('\n\n')[0])
    parser.add_argument('source', help='ImageFolder root: SOURCE/SPLIT/<class>/<image>')
    parser.add_argument('output', help='folder to create with the shards and _info.json')
    parser.add_argument('--splits', nargs='+', default=['train', 'val'], help='split folders to write')
    parser.add_argument('--shard-size', type=int, default=1000, help='images per shard (the last may hold fewer)')
    parser.add_argument('--drop-remainder', action='store_true',
                        help='leave out the last N %% shard-size images of each split, so all shards are equal '
                             '(what multi-rank training needs; they are listed in _info.json)')
    parser.add_argument('--shard-count-multiple', type=int, default=1, metavar='K',
                        help='with --drop-remainder: also leave out whole shards so their count is a multiple of K '
                             '(ranks x workers of the training run)')
    parser.add_argument('--seed', type=int, default=0, help='seed of the image order')
    parser.add_argument('--force', action='store_true', help='replace an existing output folder')
    parser.add_argument('--skip-broken', action='store_true',
                        help='leave out image files that do not decode (listed in _info.json) instead of refusing')
    args = parser.parse_args(argv)
    if not os.path.isdir(args.source):
        raise UserError(f'no source folder {args.source}')
    try:
        info = write_shards(args.source, args.output, args.splits, args.shard_size, seed=args.seed,
                            drop_remainder=args.drop_remainder, shard_count_multiple=args.shard_count_multiple,
                            force=args.force, skip_broken=args.skip_broken)
    except BrokenImages as e:
        for path, reason in e.files:
            print(f'make_shards.py: broken image {path}: {reason}', file=sys.stderr)
        raise
    for name, split in info['splits'].items():
        for entry in split['broken']:
            print(f"make_shards.py: left out broken image {entry['file']}: {entry['reason']}", file=sys.stderr)
        dropped = f", {len(split['left_out'])} left out" if split['left_out'] else ''
        dropped += f", {len(split['broken'])} broken left out" if split['broken'] else ''
        print(f"{name}: {split['num_samples']} images in {len(split['filenames'])} shards "
              f"({min(split['shard_lengths'])}-{max(split['shard_lengths'])} per shard{dropped})")
    print(f"{info['num_classes']} classes; train with --dataset wds/{info['name']} --data-dir {args.output}")


if __name__ == '__main__':
    run_main(main, 'make_shards.py')
