"""The fast CPU engine: the reference backend's replies (``wowlib.llm.reference``), several times
faster on a laptop CPU. README.md in this folder says what each part buys and how it is tested."""
