from coordinator.console.cli import main

main()
