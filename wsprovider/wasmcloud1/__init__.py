"""wasmCloud 1.x capability provider: HostData, link definitions, wRPC over NATS.

Modules, each one concern:

* ``values``   -- the component-model value encoding wRPC uses (our own codec).
* ``messaging``-- ``wasmcloud:messaging@0.2.0``'s types and functions in that encoding.
* ``wrpc``     -- wRPC over NATS ("wrpc.0.0.1"): serving and invoking, both directions.
* ``xkeys``    -- nkeys-encoded curve keys and xkv1 sealed secrets (PyNaCl box).
* ``hostdata`` -- the HostData line the host writes on stdin, validated.
* ``links``    -- link definitions: which side we are on, idempotent store.
* ``control``  -- the host's control subjects (linkdefs, health, shutdown, config).
* ``lattice``  -- ``Wasmcloud1Lattice``: the ILattice WebSocket sessions meet components on.
* ``bridge``   -- the one module coupled to provider/server/client: link -> WebSocket side.
* ``main``     -- the ``wsprovider-wasmcloud`` executable.
* ``par``      -- builds a provider archive (.par.gz) of this installation.

See docs/wasmcloud1.rst.
"""
