"""The browser SDK's unit tests (tests/node/sdk.test.mjs) under Node's own test runner,
run from trial so that the suite (and .ci/run) includes them."""

import os
import re
import shutil

from twisted.internet import utils
from twisted.trial import unittest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class NodeSdkTests(unittest.TestCase):
    timeout = 120

    def test_sdk_unit_tests_pass_under_node(self):
        node = shutil.which("node")
        if node is None:
            self.fail("node is not on PATH; install Node.js 20 or later (the SDK tests run with node --test)")
        d = utils.getProcessOutputAndValue(node, ("--test", os.path.join("tests", "node", "sdk.test.mjs")),
                                           env=dict(os.environ), path=ROOT)

        def check(result):
            out, err, code = result
            text = (out + err).decode(errors="replace")
            self.assertEqual(code, 0, text)
            passed = re.search(r"^# pass (\d+)", text, re.M)
            failed = re.search(r"^# fail (\d+)", text, re.M)
            self.assertTrue(passed and int(passed.group(1)) > 10, text)
            self.assertEqual(failed.group(1), "0", text)
        return d.addCallback(check)
