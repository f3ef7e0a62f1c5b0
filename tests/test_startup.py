"""wsprovider.startup: start-up failures become one line naming the setting (no I/O)."""

import errno
import socket

from twisted.internet.error import CannotListenError
from twisted.python.failure import Failure
from twisted.trial import unittest

from wsprovider.config import ConfigError, ProviderConfig
from wsprovider.startup import describe_start_failure, flagged


def failure_of(error):
    try:
        raise error
    except BaseException:
        return Failure()


class DescribeStartFailureTests(unittest.TestCase):
    config = ProviderConfig.from_mapping({"URI": "127.0.0.1:8080"})

    def listen_error(self, code):
        return failure_of(CannotListenError("127.0.0.1", 8080, socket.error(code, "x")))

    def test_port_in_use_names_uri_and_suggests_another_port(self):
        line = describe_start_failure(self.listen_error(errno.EADDRINUSE), self.config)
        self.assertTrue(line.startswith("--uri (URI): port 8080 on 127.0.0.1 is already in use"), line)
        self.assertIn("--uri 127.0.0.1:8081", line)
        self.assertNotIn("\n", line)

    def test_privileged_port_and_foreign_address(self):
        self.assertIn("ports below 1024", describe_start_failure(self.listen_error(errno.EACCES), self.config))
        self.assertIn("is not an address of this machine",
                      describe_start_failure(self.listen_error(errno.EADDRNOTAVAIL), self.config))

    def test_missing_tls_file_names_uri(self):
        line = describe_start_failure(failure_of(FileNotFoundError(2, "No such file", "/x/key.pem")), self.config)
        self.assertIn("--uri (URI): cannot load the TLS key or certificate", line)

    def test_config_errors_name_the_flag(self):
        line = describe_start_failure(failure_of(ConfigError("NATS_CREDS: cannot read")), self.config)
        self.assertEqual(line, "--nats-creds (NATS_CREDS): cannot read")
        self.assertEqual(flagged("not a key: x"), "not a key: x")

    def test_unknown_failures_are_left_to_the_traceback(self):
        self.assertIsNone(describe_start_failure(failure_of(ZeroDivisionError()), self.config))
