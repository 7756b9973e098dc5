"""``pgolf export``: a stack (or a finished run) as the records folder the challenge accepts, whose single
``train_gpt.py`` holds exactly the code the stack runs (``bundle``), packed as the records pack theirs
(``pack``)."""
