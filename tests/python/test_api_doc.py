"""docs/API.md shows code that runs: its complete programs are the example files byte for
byte, each of those files is built and run by `make test`, and the page, the Rust
declarations (moas-sys) and the ABI suppressions keep up with include/moas.h."""
import os
import re
import unittest

TOP = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
QUOTE = re.compile(r"<!-- quote: (\S+) -->\n```(\w+)\n(.*?)```\n", re.S)


def read(path):
    with open(os.path.join(TOP, path), encoding="utf-8") as f:
        return f.read()


def header_struct_fields():
    """{struct: [field names in order]} of each `typedef struct NAME { ... } NAME;` of
    moas.h (a function pointer's field is the name inside its parentheses)."""
    text = re.sub(r"/\*.*?\*/", " ", read("include/moas.h"), flags=re.S)
    structs = {}
    for name, body in re.findall(r"typedef struct (\w+) \{(.*?)\} \1;", text, flags=re.S):
        names = []
        for decl in body.split(";"):
            decl = decl.strip()
            if decl:
                pointer = re.search(r"\(\s*\*\s*(\w+)\s*\)", decl)
                names.append(pointer.group(1) if pointer else
                             re.search(r"(\w+)\s*(\[[^\]]*\])?$", decl).group(1))
        structs[name] = names
    return structs


def header_functions():
    return sorted(set(re.findall(r"MOAS_API\s+[^;(]*?\b(moas_\w+)\s*\(", read("include/moas.h"))))


class ApiDoc(unittest.TestCase):
    def setUp(self):
        self.doc = read("docs/API.md")

    def test_quoted_programs_are_the_files(self):
        quotes = QUOTE.findall(self.doc)
        self.assertEqual(len(quotes), self.doc.count("<!-- quote:"), "a quote without a block")
        for path, _lang, body in quotes:
            self.assertEqual(body, read(path), "docs/API.md's copy of %s is stale" % path)

    def test_one_program_per_language(self):
        langs = {lang: path for path, lang, _ in QUOTE.findall(self.doc)}
        self.assertEqual(sorted(langs), ["c", "cpp", "python", "rust"])

    def test_quoted_programs_run_in_make_test(self):
        runners = read("Makefile") + "".join(
            read(os.path.join("tests", f)) for f in os.listdir(os.path.join(TOP, "tests"))
            if f.endswith(".sh")) + read("tests/python/test_binding.py")
        for path, _lang, _ in QUOTE.findall(self.doc):
            # a Rust program is built through its workspace's directory, and run as
            # debug/examples/NAME
            if path.startswith("bindings/rust/") and "/examples/" in path:
                example = os.path.basename(path)[:-len(".rs")]
                self.assertIn('path = "examples/%s.rs"' % example,
                              read(path.split("/examples/")[0] + "/Cargo.toml"))
                self.assertTrue("cd bindings/rust" in runners
                                and "debug/examples/" + example in runners,
                                "%s is quoted but nothing in make test runs it" % path)
            else:
                self.assertIn(path, runners, "%s is quoted but nothing in make test runs it" % path)

    def test_every_public_function_is_in_the_tour(self):
        missing = []
        for name in header_functions():
            if name in self.doc:
                continue
            # table shorthand: `_n_layer` after moas_model, `_array_float` after moas_model_meta
            short = [name[len(p):] for p in ("moas_model_meta", "moas_model", "moas_context",
                                            "moas_sampler") if name.startswith(p + "_")]
            if not any(re.search(r"`" + re.escape(s) + r"[`(]", self.doc) for s in short):
                missing.append(name)
        self.assertEqual(missing, [], "docs/API.md does not mention these")

    def test_rust_ffi_declares_the_whole_header(self):
        lib = read("bindings/rust/moas-sys/src/lib.rs")
        declared = set(re.findall(r"pub fn (moas_\w+)\(", lib))
        self.assertEqual(set(header_functions()) - declared, set(), "missing from moas-sys")
        self.assertEqual(declared - set(header_functions()), set(), "not in moas.h")

    def test_params_layouts_list_every_field_of_the_header(self):
        # src/core.c lists each size-prefixed struct's fields so that a size cutting one
        # is refused; a field missing there would be cut silently. Offsets alone cannot
        # tell a missing field from padding, so its list is checked against moas.h.
        header = header_struct_fields()
        listed = {}
        for struct, member in re.findall(r"MOAS__FIELD\((moas_\w+), (\w+)\)",
                                         read("src/core.c")):
            listed.setdefault(struct, []).append(member)
        self.assertEqual(len(listed), 7)
        for struct, members in listed.items():
            self.assertEqual(members, header[struct], struct)

    def test_abi_layout_lists_every_struct_and_field_of_the_header(self):
        # abi/layout.c prints the layout the bindings' structs are checked against
        # (test_binding.py, moas-sys's tests/layout.rs): a field it leaves out would go
        # unchecked in both
        listed = {}
        entries = re.findall(r"\b(STRUCT|FIELD|ARRAY_FIELD)\((moas_\w+)(?:, (\w+))?\);",
                             read("abi/layout.c"))
        for kind, struct, field in entries:
            if kind == "STRUCT":
                listed[struct] = []
            else:
                listed[struct].append(field)
        self.assertEqual(listed, header_struct_fields())

    def test_abi_suppressions_name_every_count_enumerator(self):
        counts = set(re.findall(r"^\s+(MOAS_\w+_COUNT)\b", read("include/moas.h"), re.M))
        self.assertIn("MOAS_MODE_COUNT", counts)
        listed = set(re.findall(r"MOAS_\w+_COUNT", read("abi/libmoas.suppr")))
        self.assertEqual(counts - listed, set())


if __name__ == "__main__":
    unittest.main()
