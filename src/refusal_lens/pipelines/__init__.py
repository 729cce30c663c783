"""Stage 6, end-to-end pipelines that chain every stage: :mod:`.demo` (the whole study on the organism)
and :mod:`.organism_artifacts` (the organism's shipped direction and SAEs). Imports every lower stage.
"""
