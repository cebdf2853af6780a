"""The command line: above every other package (it may import any; none imports it)."""
