"""`python -m memscan.demo ...`: the same commands as `memscan demo ...` (memscan.demo.cli)."""
from memscan.demo.cli import demo_app

if __name__ == "__main__":
    demo_app(prog_name="python -m memscan.demo")
