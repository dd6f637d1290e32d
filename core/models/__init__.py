"""Pure modules and their maths: no file I/O, no command-line parsing."""
