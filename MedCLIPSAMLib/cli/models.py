"""`medclipsam models list | download NAME | verify [NAME] [--adopt] | trained [--add DIR | --remove NAME]`."""


def register(sub):
    p = sub.add_parser("models", help="list, download and verify the models")
    msub = p.add_subparsers(dest="models_command", metavar="ACTION", required=True)
    msub.add_parser("list", help="the registry: names, sources, licences, sizes, and what is in the cache").set_defaults(func=list_models)
    d = msub.add_parser("download", help="download a model into the cache (progress, resume, checksums)")
    d.add_argument("name")
    d.add_argument("--force", action="store_true", help="download again even if the cache verifies")
    d.set_defaults(func=download)
    v = msub.add_parser("verify", help="check cached models against their recorded checksums")
    v.add_argument("name", nargs="?", help="one model (default: every cached model)")
    v.add_argument("--adopt", action="store_true",
                   help="record checksums for files placed in the cache by hand (offline installs)")
    v.set_defaults(func=verify)
    t = msub.add_parser("trained", help="models trained here (train-weak, medclipseg train) that the Slicer panel offers")
    t.add_argument("--add", metavar="MODEL_DIR", help="register a trained model folder (its kind is read from its files)")
    t.add_argument("--name", help="name for --add (default: the folder's name)")
    t.add_argument("--remove", metavar="NAME", help="forget a registered model (its folder is kept)")
    t.set_defaults(func=trained)


def table(rows, right=()):
    """Lines of text with each column as wide as its widest cell (columns in `right` right-aligned); the
    last column is not padded."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return ["  ".join(cell.rjust(w) if i in right else cell if i == len(row) - 1 else cell.ljust(w)
                      for i, (cell, w) in enumerate(zip(row, widths))) for row in rows]


def list_models(args):
    from ..models import cache
    from ..models.download import required_files
    from ..models.registry import RANDOM_MODELS, REGISTRY

    rows = [("name", "kind", "size", "licence", "cached", "source")]
    for entry in REGISTRY.values():
        folder = cache.model_dir(entry.name)
        present = all((folder / f).is_file() for f in required_files(entry))
        cached = "yes" if present else "partial" if cache.holds_files(folder) else "no"   # as `models verify` sees it
        rows.append((entry.name, entry.kind, f"{entry.approx_size_mb}MB", entry.licence, cached,
                     ", ".join(s.repo for s in entry.sources)))
    for name, what in RANDOM_MODELS.items():
        rows.append((name, "-", "-", "-", "-", f"built locally: {what}"))
    print(f"cache: {cache.home() / 'models'}")
    print("\n".join(table(rows, right={2})))
    return 0


def download(args):
    from ..models.download import download as fetch

    folder = fetch(args.name, force=args.force)
    print(f"{args.name}: downloaded and verified in {folder}")
    return 0


def verify(args):
    from ..errors import MedCLIPSAMError
    from ..models import cache
    from ..models.download import how_to_get, required_files
    from ..models.registry import REGISTRY, get_entry

    names = [args.name] if args.name else [n for n in REGISTRY if cache.holds_files(cache.model_dir(n))]
    if not names:
        print("no models in the cache yet")
        return 0
    failed = 0
    for name in names:
        entry = get_entry(name)
        folder = cache.model_dir(name)
        files = required_files(entry)
        try:
            if args.adopt:
                missing = [f for f in files if not (folder / f).is_file()]
                if missing:
                    raise MedCLIPSAMError(cache.missing_files_message(name, folder, missing, how_to_get(entry)))
                known = (cache.read_manifest(folder) or {"files": {}})["files"]
                cache.record_files(folder, {f: None for f in files if f not in known}, source="placed by hand",
                                   extra={"name": name, "licence": entry.licence})
            cache.verify(folder, files, name, how_to_get(entry))
            print(f"{name}: ok ({len(files)} files)")
        except MedCLIPSAMError as exc:
            failed += 1
            print(f"{name}: FAILED: {exc}")
    return 1 if failed else 0


def trained(args):
    from .. import trained_models

    if args.add:
        entry = trained_models.add(args.add, args.name)
        print(f"registered '{entry['name']}' ({entry['kind']}): {entry['folder']}")
        return 0
    if args.remove:
        trained_models.remove(args.remove)
        print(f"forgot '{args.remove}'")
        return 0
    models = trained_models.list_models()
    print(f"registry: {trained_models.registry_path()}")
    if not models:
        print("no trained models registered")
    rows = [(m["name"], m["kind"], ", ".join(m["labels"]), m["date"],
             m["folder"] + ("" if m["present"] else "  (folder missing or incomplete)")) for m in models]
    if rows:
        print("\n".join(table(rows)))
    return 0
