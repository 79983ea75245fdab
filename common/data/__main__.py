from common.data.preview import main

main()
