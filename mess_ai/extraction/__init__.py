"""The parts of extraction that ``mess_ai.pipeline.ExtractionSession`` puts together.

- ``plan``: which files a run works on, a pure function of manifest rows, file states and the content key;
- ``track``: one attempt on one track, the only owner of its lock and of its attempt in the manifest;
- ``steps``: the work on files (what the plan needs, read a header, open, decode, write features) and the model;
- ``model_stage``: the model, loaded once, and prepared tracks run through it, their features written;
- ``dataset``: which folder and config a dataset holds, and the refusal of another;
- ``provenance``: what the features were made with, written next to them;
- ``stats``: what a run did (stage times, outcomes, counts), and its summary;
- ``noop``: the plan made read-only before any run, to find that a run would have nothing to do.
"""
