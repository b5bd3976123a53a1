from backbench.cli import main

main()
