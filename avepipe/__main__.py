from avepipe.cli import main

main()
