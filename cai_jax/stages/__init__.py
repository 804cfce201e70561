"""Pipeline stages: revise -> sft -> label -> pm -> ppo -> evaluate.

Each stage module exposes `run(config, workdir)`; it reads earlier stages'
artifacts from WORKDIR/<stage>/ and writes its own, with a DONE marker last.
"""
