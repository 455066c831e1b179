"""What the test suites and the benchmarks share (one copy of each).

* :mod:`tests.support.waiting`: ``wait_until``, the one polling wait;
* :mod:`tests.support.services`: broker addresses and skip-or-fail for services;
* :mod:`tests.support.processes`: broker processes of a test's own (Redis,
  Mosquitto) and a self-signed certificate;
* :mod:`tests.support.daemon`: config files, the REST client and an in-process daemon;
* :mod:`tests.support.mail`: the SMTP sink and its server, message bodies and tags;
* :mod:`tests.support.brokers`: ``otpd broker`` accounts and broker settings;
* :mod:`tests.support.publishers`: the client library's publishers, with what
  the tests add to them; an MQTT peer emulating OTP-Publisher;
* :mod:`tests.support.gateway`: ``Gateway``, a running daemon and its receivers.

Fixtures wrapping these live in the suites' ``conftest.py``.
"""
