"""``/playground``: a web page to see what each policy keeps, answers and costs; its API routes."""
