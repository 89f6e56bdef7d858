from compter.cli import main

main()
