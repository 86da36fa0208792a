"""What the tests of every layer, and the benchmarks in bench/, share: the daemon and client
processes, users and random files, a raw client, a hostile server, the in-memory conversation.
bench/ imports from here; nothing here imports bench/."""
