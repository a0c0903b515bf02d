"""Load generators: seeded workloads, the open-loop asyncio client, the locustfile, reports."""
