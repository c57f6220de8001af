"""``python -m diffattn.app``: the Gradio demo (``diffattn demo``)."""

from diffattn.app.demo import main

main()
