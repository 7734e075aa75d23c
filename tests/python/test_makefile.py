"""The Makefile's builds keep out of each other's way: a build in another BUILD
directory (other flags, OpenMP off) writes its library and CLI inside that directory,
never into lib/ and bin/, where the default build would take them for its own (they
are newer than its objects, so it would not rebuild them). Read from `make -n`: what
make would run, without running it."""
import os
import re
import subprocess
import unittest

# a make that runs these tests passes its own flags and command-line variables down
# in the environment: this make is to see the Makefile's defaults, not those
CLEAN_ENV = {k: v for k, v in os.environ.items() if k not in ("MAKEFLAGS", "MFLAGS", "MAKELEVEL")}

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def planned_outputs(*args):
    """The files the commands of `make -n ARGS` would write with -o, ar or ln."""
    r = subprocess.run(["make", "-n", "--no-print-directory", "-C", ROOT] + list(args),
                       stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                       universal_newlines=True, timeout=120, env=CLEAN_ENV)
    if r.returncode != 0:
        raise AssertionError("make -n failed:\n" + r.stdout)
    outs = re.findall(r"(?:-o|ar rcs|ln -sf \S+)\s+(\S+)", r.stdout)
    return [o for o in outs if "libmoas" in o or o.endswith("/moas")]


class OtherBuilds(unittest.TestCase):
    def test_another_build_keeps_its_library_and_cli(self):
        outs = planned_outputs("BUILD=build-elsewhere", "OPENMP=0", "all")
        self.assertTrue(any(o.endswith("libmoas.a") for o in outs), outs)
        self.assertTrue(any(o.endswith("/moas") for o in outs), outs)
        for o in outs:
            self.assertTrue(o.startswith("build-elsewhere/"), o)

    def test_named_outputs_are_kept(self):
        outs = planned_outputs("BUILD=build-elsewhere", "LIBOUT=build-l", "BINOUT=build-b",
                               "all")
        self.assertTrue(outs)
        for o in outs:
            self.assertTrue(o.startswith(("build-l/", "build-b/")), o)


if __name__ == "__main__":
    unittest.main()
