"""`medclipsam demo`: segment a sample volume from a text prompt (the README's first command)."""


def register(sub):
    p = sub.add_parser("demo", help="segment a sample volume from a text prompt and write .seg.nrrd + PNG overview")
    p.add_argument("--output-dir", default="demo-output")
    p.add_argument("--prompt", default=None, help="text prompt (default: the sample's own target)")
    p.add_argument("--device", default="auto")
    p.add_argument("--progress", default="bar", choices=("bar", "json", "none"))
    p.set_defaults(func=run)


def run(args):
    from ..demo import run_demo

    return run_demo(args)
