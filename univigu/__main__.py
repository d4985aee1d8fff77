from univigu.cli import main

main()
