"""The run folder and what every stage shares: config, run layout, shards and manifests, policy
folders, stage resources, live curves, prepare's sources, the round batch and the optimizer update."""
